//! The restore gate: the marker file the gateway unit waits for, and the
//! decision between restoring a snapshot and opening on a fresh host.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};

use crate::keys::{LatestPointer, SnapshotKey};

/// What is at the marker path.
#[derive(Debug, PartialEq, Eq)]
pub enum MarkerState {
    Absent,
    /// A regular file: a restore or fresh-host decision completed.
    Present,
    /// A symlink, directory or other non-regular file. The gate stays shut,
    /// because something other than the agent put it there.
    Invalid(String),
}

/// Looks at the marker path without following a symlink.
pub fn inspect_marker(path: &Path) -> std::io::Result<MarkerState> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            Ok(MarkerState::Invalid("is a symbolic link".to_string()))
        }
        Ok(meta) if meta.is_file() => Ok(MarkerState::Present),
        Ok(meta) if meta.is_dir() => Ok(MarkerState::Invalid("is a directory".to_string())),
        Ok(_) => Ok(MarkerState::Invalid("is not a regular file".to_string())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(MarkerState::Absent),
        Err(error) => Err(error),
    }
}

/// Writes the marker atomically: a temporary file in the same directory,
/// fsync, rename over the marker path, fsync the directory. A crash at any
/// point leaves either no marker or a complete one.
pub fn write_marker(path: &Path, content: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("the marker path {} has no parent directory", path.display()))?;
    let file_name = path
        .file_name()
        .with_context(|| format!("the marker path {} has no file name", path.display()))?;
    let temp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&temp)?;
        file.write_all(content.as_bytes())?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        File::open(dir)?.sync_all()
    };
    if let Err(error) = write() {
        let _ = fs::remove_file(&temp);
        bail!(
            "cannot write the restore marker {}: {error}; check that {} exists and is \
             writable by the agent's user",
            path.display(),
            dir.display()
        );
    }
    Ok(())
}

/// What the restore has to do, decided from what the bucket holds.
#[derive(Debug, PartialEq, Eq)]
pub enum RestoreDecision {
    /// No pointer: either a first install (no metadata either) or a host
    /// that registered before its first backup. Nothing to restore.
    FreshHost { registered_before: bool },
    /// Restore this snapshot.
    Restore(SnapshotKey),
}

/// Decides from the two reads of step 3 of the restore protocol. Both were
/// definite answers: an outage never reaches this function.
pub fn decide(meta_exists: bool, pointer: Option<&[u8]>) -> Result<RestoreDecision, String> {
    match pointer {
        None => Ok(RestoreDecision::FreshHost {
            registered_before: meta_exists,
        }),
        Some(body) => LatestPointer::parse(body)
            .map(|pointer| RestoreDecision::Restore(pointer.snapshot))
            .map_err(|reason| format!("system/db/latest {reason}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_bucket_is_a_fresh_host() {
        assert_eq!(
            decide(false, None),
            Ok(RestoreDecision::FreshHost {
                registered_before: false
            })
        );
    }

    #[test]
    fn metadata_without_pointer_is_a_fresh_host() {
        assert_eq!(
            decide(true, None),
            Ok(RestoreDecision::FreshHost {
                registered_before: true
            })
        );
    }

    #[test]
    fn pointer_means_restore() {
        let decision = decide(true, Some(b"system/db/snapshots/2026-04-26T1800Z.dump\n"));
        assert_eq!(
            decision,
            Ok(RestoreDecision::Restore(
                SnapshotKey::parse("system/db/snapshots/2026-04-26T1800Z.dump").unwrap()
            ))
        );
    }

    #[test]
    fn pointer_without_metadata_still_restores() {
        let decision = decide(false, Some(b"system/db/snapshots/2026-04-26T1800Z.dump"));
        assert!(matches!(decision, Ok(RestoreDecision::Restore(_))));
    }

    #[test]
    fn malformed_pointer_fails() {
        let error = decide(true, Some(b"../../etc/passwd")).unwrap_err();
        assert!(error.starts_with("system/db/latest"), "{error}");
    }

    #[test]
    fn marker_states() {
        let dir = std::env::temp_dir().join(format!("gate-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("restore-complete");
        assert_eq!(inspect_marker(&marker).unwrap(), MarkerState::Absent);
        write_marker(&marker, "fresh\n").unwrap();
        assert_eq!(inspect_marker(&marker).unwrap(), MarkerState::Present);
        fs::remove_file(&marker).unwrap();
        std::os::unix::fs::symlink(dir.join("elsewhere"), &marker).unwrap();
        assert!(matches!(
            inspect_marker(&marker).unwrap(),
            MarkerState::Invalid(_)
        ));
        fs::remove_file(&marker).unwrap();
        fs::create_dir(&marker).unwrap();
        assert!(matches!(
            inspect_marker(&marker).unwrap(),
            MarkerState::Invalid(_)
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
