//! A stand-in for `/usr/lib/postgresql` (`MATRIX_PG_INSTALL_ROOT`) whose
//! `pg_dump` or `pg_restore` is a shell script wrapped around the real one,
//! so that a test can make a dump slow or make a dump or restore fail
//! half-way.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;

use crate::postgres::PgBin;

const DUMP_STARTED: &str = "pg-dump-started";

/// `<root>/<major>/bin` holding one wrapped program and symlinks to every
/// other program of the real installation.
pub struct FakeInstallRoot {
    dir: TempDir,
}

impl FakeInstallRoot {
    /// Creates a root whose `pg_dump` runs `script` with `$real_pg_dump` set to the
    /// real program. `pg_dump --version` always runs the real program at
    /// once, so that only dumps are affected.
    pub fn with_pg_dump_script(bin: &PgBin, script: &str) -> FakeInstallRoot {
        FakeInstallRoot::with_program_script(
            bin,
            "pg_dump",
            &format!("real_pg_dump=\"$real_program\"\n{script}"),
        )
    }

    /// Creates a root whose `program` (`pg_dump`, `pg_restore`, ...) runs
    /// `script` with `$real_program` set to the real program and `$state`
    /// to a directory the script may keep files in. `--version` always runs
    /// the real program at once.
    pub fn with_program_script(bin: &PgBin, program: &str, script: &str) -> FakeInstallRoot {
        let dir = tempfile::Builder::new()
            .prefix("matrix-pg-root-")
            .tempdir()
            .expect("creating the fake install root");
        let fake_bin = dir.path().join(bin.major().to_string()).join("bin");
        fs::create_dir_all(&fake_bin).expect("creating the fake bin directory");

        for entry in fs::read_dir(bin.dir()).expect("listing the real bin directory") {
            let entry = entry.expect("reading the real bin directory");
            if entry.file_name() != program {
                symlink(entry.path(), fake_bin.join(entry.file_name()))
                    .expect("linking a real PostgreSQL program");
            }
        }

        let wrapper = format!(
            "#!/bin/sh\n\
             # {program} stand-in written by the matrix-agent integration tests.\n\
             real_program='{}'\n\
             state='{}'\n\
             for arg in \"$@\"; do\n\
             \tcase \"$arg\" in --version|-V) exec \"$real_program\" \"$@\" ;; esac\n\
             done\n\
             {script}\n",
            bin.program(program).display(),
            dir.path().display()
        );
        let wrapper_path = fake_bin.join(program);
        fs::write(&wrapper_path, wrapper).expect("writing the program wrapper");
        fs::set_permissions(&wrapper_path, fs::Permissions::from_mode(0o755))
            .expect("making the program wrapper executable");

        FakeInstallRoot { dir }
    }

    /// Creates a root whose `pg_dump` passes on the first `bytes` of the real dump
    /// and then exits with status 1.
    pub fn failing_pg_dump(bin: &PgBin, bytes: u64) -> FakeInstallRoot {
        FakeInstallRoot::with_pg_dump_script(
            bin,
            &format!("\"$real_pg_dump\" \"$@\" | head -c {bytes}\nexit 1"),
        )
    }

    /// Creates a root whose `pg_dump` creates [`FakeInstallRoot::dump_started`]
    /// and then sleeps for `delay` before it runs the real program.
    pub fn slow_pg_dump(bin: &PgBin, delay: Duration) -> FakeInstallRoot {
        FakeInstallRoot::with_pg_dump_script(
            bin,
            &format!(
                ": > \"$(dirname \"$0\")/../../{DUMP_STARTED}\"\n\
                 sleep {}\n\
                 exec \"$real_pg_dump\" \"$@\"",
                delay.as_secs()
            ),
        )
    }

    /// Returns the file a slow `pg_dump` creates when a dump starts.
    pub fn dump_started(&self) -> PathBuf {
        self.dir.path().join(DUMP_STARTED)
    }

    /// Returns the value for `MATRIX_PG_INSTALL_ROOT`.
    pub fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}
