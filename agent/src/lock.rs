//! The exclusive lock that keeps two backups from overlapping on one host.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::Context;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::LockedError;

/// Held for the whole backup; the kernel releases it when the process
/// exits, however it exits, so a killed run never leaves a stale lock.
pub struct BackupLock {
    _file: Flock<File>,
}

impl BackupLock {
    /// Takes the lock without waiting, or fails with [`LockedError`] naming
    /// the process that holds it.
    pub fn acquire(state_dir: &Path) -> anyhow::Result<BackupLock> {
        let path = state_dir.join("backup.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open the backup lock {}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut locked) => {
                locked.set_len(0)?;
                locked.seek(SeekFrom::Start(0))?;
                writeln!(locked, "{}", std::process::id())?;
                Ok(BackupLock { _file: locked })
            }
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => format!("lock {}", path.display()),
                    pid => format!("pid {pid}, lock {}", path.display()),
                };
                Err(LockedError { holder }.into())
            }
            Err((_, errno)) => Err(anyhow::anyhow!("cannot lock {}: {errno}", path.display())),
        }
    }
}
