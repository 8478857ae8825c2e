//! The host's picture for operators and monitors: gate, restore, last
//! backup, registration and heartbeat, with one health verdict.
//!
//! `matrix-agent status`, the `/status` and `/healthz` endpoints, the
//! metrics and `system/host-status.json` all render this one report.

use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{Config, Env};
use crate::error::ConfigError;
use crate::gate::{self, MarkerState};
use crate::keys::{self, LatestPointer};
use crate::size::{format_bytes, format_duration};
use crate::state::{
    BackupRecord, HeartbeatRecord, RegistrationRecord, RegistrationState, RestoreRecord, StateDir,
};
use crate::store;
use crate::store::ObjectStore;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// How long `status` waits for the bucket before printing without it.
const BUCKET_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Debug, Serialize)]
pub struct GateReport {
    pub open: bool,
    pub marker: String,
    pub opened_at: Option<DateTime<Utc>>,
    pub problem: Option<String>,
}

/// What the bucket's pointer says, when `status` asked it.
#[derive(Clone, Debug, Serialize)]
pub struct BucketReport {
    pub latest: Option<String>,
    /// Whether `latest` names the snapshot this host last uploaded.
    pub matches_last_backup: Option<bool>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct HostReport {
    pub agent_version: &'static str,
    pub image_version: Option<String>,
    pub machine_id: String,
    pub generated_at: DateTime<Utc>,
    pub gate: GateReport,
    pub restore: Option<RestoreRecord>,
    pub backup: BackupRecord,
    pub registration: Option<RegistrationRecord>,
    pub heartbeat: HeartbeatRecord,
    pub bucket: Option<BucketReport>,
    pub health: Health,
}

/// Reads the local state; touches neither the network nor the database.
pub fn gather(config: &Config, state: &StateDir, backup_interval: Duration) -> HostReport {
    let gate = gate_report(config);
    let backup = state.backup();
    let heartbeat = state.heartbeat();
    let now = Utc::now();
    let health = judge_health(&gate, &backup, &heartbeat, backup_interval, now);
    HostReport {
        agent_version: AGENT_VERSION,
        image_version: config.image_version.clone(),
        machine_id: config.machine_id.to_string(),
        generated_at: now,
        gate,
        restore: state.restore(),
        backup,
        registration: state.registration(&config.machine_id.to_string()),
        heartbeat,
        bucket: None,
        health,
    }
}

fn gate_report(config: &Config) -> GateReport {
    let marker = config.restore_marker.display().to_string();
    match gate::inspect_marker(&config.restore_marker) {
        Ok(MarkerState::Present) => GateReport {
            open: true,
            opened_at: std::fs::metadata(&config.restore_marker)
                .and_then(|meta| meta.modified())
                .ok()
                .map(DateTime::<Utc>::from),
            marker,
            problem: None,
        },
        Ok(MarkerState::Absent) => GateReport {
            open: false,
            marker,
            opened_at: None,
            problem: Some("the restore has not completed".to_string()),
        },
        Ok(MarkerState::Invalid(why)) => GateReport {
            open: false,
            problem: Some(format!("the marker {why}")),
            marker,
            opened_at: None,
        },
        Err(error) => GateReport {
            open: false,
            problem: Some(format!("cannot inspect the marker: {error}")),
            marker,
            opened_at: None,
        },
    }
}

/// Decides health: the gate is open, the host is not superseded, and the
/// last successful backup is younger than two backup intervals, or the
/// gate opened less than two intervals ago (no backup was due yet).
pub fn judge_health(
    gate: &GateReport,
    backup: &BackupRecord,
    heartbeat: &HeartbeatRecord,
    backup_interval: Duration,
    now: DateTime<Utc>,
) -> Health {
    let unhealthy = |reason: String| Health {
        healthy: false,
        reason,
    };
    if !gate.open {
        return unhealthy(format!(
            "restore gate shut: {}",
            gate.problem.as_deref().unwrap_or("unknown")
        ));
    }
    if let Some(other) = &heartbeat.superseded_by {
        return unhealthy(format!(
            "superseded: the bucket belongs to machine {other}; this host no longer writes"
        ));
    }
    let limit = chrono::Duration::from_std(backup_interval * 2).unwrap_or(chrono::TimeDelta::MAX);
    if let Some(success) = &backup.last_success {
        let age = now - success.finished_at;
        if age <= limit {
            return Health {
                healthy: true,
                reason: format!("last backup {} ago", describe_age(age)),
            };
        }
        return unhealthy(format!(
            "last successful backup was {} ago, more than twice the backup interval",
            describe_age(age)
        ));
    }
    match gate.opened_at {
        Some(opened) if now - opened <= limit => Health {
            healthy: true,
            reason: format!(
                "no backup yet; the gate opened {} ago",
                describe_age(now - opened)
            ),
        },
        _ => unhealthy(
            "no successful backup since the gate opened, more than two backup intervals ago"
                .to_string(),
        ),
    }
}

fn describe_age(age: chrono::Duration) -> String {
    format_duration(age.to_std().unwrap_or_default())
}

/// Asks the bucket what `latest` names and compares it with the last
/// backup this host made.
pub async fn bucket_report(
    store: &dyn ObjectStore,
    config: &Config,
    backup: &BackupRecord,
) -> BucketReport {
    let key = config.object_key(keys::LATEST);
    match store.get(&key).await {
        Ok(None) => BucketReport {
            latest: None,
            matches_last_backup: backup.last_success.as_ref().map(|_| false),
            error: None,
        },
        Ok(Some(object)) => match LatestPointer::parse(&object.body) {
            Ok(pointer) => {
                let latest = pointer.snapshot.key();
                BucketReport {
                    matches_last_backup: backup
                        .last_success
                        .as_ref()
                        .map(|success| success.snapshot == latest),
                    latest: Some(latest),
                    error: None,
                }
            }
            Err(reason) => BucketReport {
                latest: None,
                matches_last_backup: None,
                error: Some(format!("system/db/latest {reason}")),
            },
        },
        Err(error) => BucketReport {
            latest: None,
            matches_last_backup: None,
            error: Some(error.to_string()),
        },
    }
}

/// Prints the report, asking the bucket what `latest` names.
pub async fn run(env: &Env, json: bool) -> anyhow::Result<()> {
    let config = Config::from_env(env)?;
    let backup_interval = match env.get("MATRIX_BACKUP_INTERVAL") {
        None => Duration::from_secs(3600),
        Some(text) => crate::size::parse_duration(text).map_err(|reason| ConfigError {
            problems: vec![format!("MATRIX_BACKUP_INTERVAL is invalid: {reason}")],
        })?,
    };
    let state = StateDir::existing(&config.state_dir);
    let mut report = gather(&config, &state, backup_interval);
    let bucket = match store::open(&config.store).await {
        Ok(store) => {
            let lookup = bucket_report(store.as_ref(), &config, &report.backup);
            match tokio::time::timeout(BUCKET_TIMEOUT, lookup).await {
                Ok(bucket) => bucket,
                Err(_) => BucketReport {
                    latest: None,
                    matches_last_backup: None,
                    error: Some(format!("no answer within {}s", BUCKET_TIMEOUT.as_secs())),
                },
            }
        }
        Err(error) => BucketReport {
            latest: None,
            matches_last_backup: None,
            error: Some(format!("{error:#}")),
        },
    };
    report.bucket = Some(bucket);
    // A closed stdout (`status | head -1`) is the reader's choice, not an
    // error worth a panic.
    let text = if json {
        format!("{}\n", serde_json::to_string_pretty(&report)?)
    } else {
        render_human(&report)
    };
    let _ = std::io::stdout().write_all(text.as_bytes());
    Ok(())
}

/// Renders the report for a person at a terminal.
pub fn render_human(report: &HostReport) -> String {
    let mut out = String::new();
    let now = report.generated_at;
    let age = |time: DateTime<Utc>| describe_age(now - time);
    let verdict = if report.health.healthy {
        "healthy"
    } else {
        "UNHEALTHY"
    };
    let _ = writeln!(out, "health:        {verdict}: {}", report.health.reason);
    let _ = writeln!(
        out,
        "machine:       {} (agent {}, image {})",
        report.machine_id,
        report.agent_version,
        report.image_version.as_deref().unwrap_or("unknown")
    );
    let gate = if report.gate.open {
        match report.gate.opened_at {
            Some(opened) => format!(
                "open since {} ({} ago)",
                opened.format("%Y-%m-%d %H:%M:%SZ"),
                age(opened)
            ),
            None => "open".to_string(),
        }
    } else {
        format!(
            "SHUT: {}",
            report.gate.problem.as_deref().unwrap_or("unknown")
        )
    };
    let _ = writeln!(out, "restore gate:  {gate} [{}]", report.gate.marker);
    let restore = match &report.restore {
        None => "no record".to_string(),
        Some(record) => match (&record.snapshot, &record.error) {
            (_, Some(error)) => format!("FAILED {} ago: {error}", age(record.finished_at)),
            (Some(snapshot), None) => format!(
                "restored {snapshot} ({}) {} ago in {}",
                format_bytes(record.size.unwrap_or_default()),
                age(record.finished_at),
                format_duration(Duration::from_secs_f64(record.duration_seconds.max(0.0)))
            ),
            (None, None) => format!(
                "fresh host, nothing to restore ({} ago)",
                age(record.finished_at)
            ),
        },
    };
    let _ = writeln!(out, "restore:       {restore}");
    let backup = match &report.backup.last_success {
        None => "none yet".to_string(),
        Some(success) => format!(
            "{} ({}) {} ago, took {}",
            success.snapshot,
            format_bytes(success.size),
            age(success.finished_at),
            format_duration(Duration::from_secs_f64(success.duration_seconds.max(0.0)))
        ),
    };
    let _ = writeln!(out, "last backup:   {backup}");
    let failing = report.backup.consecutive_failures > 0;
    if let Some(failure) = report.backup.last_failure.as_ref().filter(|_| failing) {
        let _ = writeln!(
            out,
            "last failure:  {} ago ({} in a row, {} in all): {}",
            age(failure.at),
            report.backup.consecutive_failures,
            report.backup.failures_total,
            failure.error
        );
    }
    if let Some(bucket) = &report.bucket {
        let latest = match (&bucket.latest, &bucket.error) {
            (_, Some(error)) => format!("cannot read: {error}"),
            (Some(latest), None) => match bucket.matches_last_backup {
                Some(true) => format!("{latest} (this host's last backup)"),
                Some(false) => format!("{latest} (NOT this host's last backup)"),
                None => latest.clone(),
            },
            (None, None) => "no pointer yet".to_string(),
        };
        let _ = writeln!(out, "bucket latest: {latest}");
    }
    let registration = match &report.registration {
        None => "not attempted".to_string(),
        Some(record) => match record.state {
            RegistrationState::Registered if record.vps_meta_pending => format!(
                "registered {} ago; the platform could not store vps-meta.json and the \
                 heartbeat has not written it yet",
                record.registered_at.map(age).unwrap_or_default()
            ),
            RegistrationState::Registered => format!(
                "registered {} ago",
                record.registered_at.map(age).unwrap_or_default()
            ),
            RegistrationState::Pending => format!(
                "pending after {} attempts: {}",
                record.attempts,
                record.last_error.as_deref().unwrap_or("no error")
            ),
            RegistrationState::Rejected => format!(
                "REFUSED: {}",
                record.last_error.as_deref().unwrap_or("no detail")
            ),
        },
    };
    let _ = writeln!(out, "registration:  {registration}");
    let heartbeat = match (
        &report.heartbeat.superseded_by,
        report.heartbeat.last_success_at,
    ) {
        (Some(other), _) => format!("STOPPED: superseded by machine {other}"),
        (None, Some(at)) => format!("last sent {} ago", age(at)),
        (None, None) => "none sent yet".to_string(),
    };
    let _ = writeln!(out, "heartbeat:     {heartbeat}");
    if let Some(failure) = &report.heartbeat.last_failure {
        let _ = writeln!(
            out,
            "  last failure {} ago: {}",
            age(failure.at),
            failure.error
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{BackupSuccess, HeartbeatRecord};

    const HOUR: Duration = Duration::from_secs(3600);

    fn open_gate(opened_at: DateTime<Utc>) -> GateReport {
        GateReport {
            open: true,
            marker: "/opt/matrix/restore-complete".into(),
            opened_at: Some(opened_at),
            problem: None,
        }
    }

    fn backed_up(at: DateTime<Utc>) -> BackupRecord {
        BackupRecord {
            last_success: Some(BackupSuccess {
                snapshot: "system/db/snapshots/2026-04-26T1800Z.dump".into(),
                size: 1,
                sha256: String::new(),
                part_size: 8 << 20,
                parts: 1,
                finished_at: at,
                duration_seconds: 1.0,
                pointer_moved: true,
            }),
            ..BackupRecord::default()
        }
    }

    #[test]
    fn recent_backup_is_healthy() {
        let now = Utc::now();
        let health = judge_health(
            &open_gate(now - chrono::Duration::days(3)),
            &backed_up(now - chrono::Duration::minutes(70)),
            &HeartbeatRecord::default(),
            HOUR,
            now,
        );
        assert!(health.healthy, "{health:?}");
    }

    #[test]
    fn stale_backup_is_unhealthy() {
        let now = Utc::now();
        let health = judge_health(
            &open_gate(now - chrono::Duration::days(3)),
            &backed_up(now - chrono::Duration::minutes(121)),
            &HeartbeatRecord::default(),
            HOUR,
            now,
        );
        assert!(!health.healthy);
        assert!(
            health.reason.contains("last successful backup"),
            "{}",
            health.reason
        );
    }

    #[test]
    fn new_gate_without_backup_is_healthy_for_two_intervals() {
        let now = Utc::now();
        let fresh = open_gate(now - chrono::Duration::minutes(30));
        let old = open_gate(now - chrono::Duration::minutes(150));
        let none = BackupRecord::default();
        let heartbeat = HeartbeatRecord::default();
        assert!(judge_health(&fresh, &none, &heartbeat, HOUR, now).healthy);
        assert!(!judge_health(&old, &none, &heartbeat, HOUR, now).healthy);
    }

    #[test]
    fn shut_gate_and_superseded_host_are_unhealthy() {
        let now = Utc::now();
        let shut = GateReport {
            open: false,
            marker: "/opt/matrix/restore-complete".into(),
            opened_at: None,
            problem: Some("the restore has not completed".into()),
        };
        let backup = backed_up(now);
        let heartbeat = HeartbeatRecord::default();
        assert!(!judge_health(&shut, &backup, &heartbeat, HOUR, now).healthy);
        let superseded = HeartbeatRecord {
            superseded_by: Some("11111111-2222-4333-8444-555555555555".into()),
            ..HeartbeatRecord::default()
        };
        let health = judge_health(&open_gate(now), &backup, &superseded, HOUR, now);
        assert!(!health.healthy);
        assert!(health.reason.starts_with("superseded"), "{}", health.reason);
    }
}
