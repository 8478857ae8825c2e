//! Failures that decide the process exit status.

use std::fmt;

/// Exit status for a run that completed.
pub const EXIT_OK: u8 = 0;
/// Exit status for a run that failed.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status for bad configuration or usage.
pub const EXIT_USAGE: u8 = 2;
/// Exit status when another backup holds the lock (EX_TEMPFAIL).
pub const EXIT_LOCKED: u8 = 75;

/// Settings that are missing or malformed, all reported at once.
///
/// Each problem names the variable and what is wrong with it, never the
/// value, so a secret cannot leak through this error.
#[derive(Debug)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}", self.problems.join("; "))
    }
}

impl std::error::Error for ConfigError {}

/// Another backup run holds the lock.
#[derive(Debug)]
pub struct LockedError {
    pub holder: String,
}

impl fmt::Display for LockedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "another backup is running ({}); this run exits without \
             touching the bucket",
            self.holder
        )
    }
}

impl std::error::Error for LockedError {}

/// Maps an error chain to the process exit status.
pub fn exit_status(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<ConfigError>().is_some() {
        EXIT_USAGE
    } else if error.downcast_ref::<LockedError>().is_some() {
        EXIT_LOCKED
    } else {
        EXIT_FAILURE
    }
}
