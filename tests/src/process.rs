//! Child processes that must not outlive the test that started them.
//!
//! Servers get a `Drop` guard that stops them, which covers a panicking
//! test. The parent-death signal set here covers the rest: a test binary
//! that is killed, or a child that a guard never got to see.

use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::prctl;
use nix::sys::signal::{self, Signal};
use nix::unistd::{self, Pid};

/// Makes the kernel send `signal` to the child when the thread that spawns
/// it exits.
///
/// Linux ties the parent-death signal to the spawning thread, not the
/// process. Every test runs on its own thread and spawns its children from
/// it, so the signal arrives when the test ends at the latest. Spawn from a
/// pool thread and the child dies when that thread is retired.
pub fn kill_with_parent(command: &mut Command, signal: Signal) {
    let parent = unistd::getpid();

    // SAFETY: the closure runs between fork and exec and only makes the
    // async-signal-safe system calls prctl and getppid. It runs after the
    // uid and gid changes, which would otherwise clear the setting.
    unsafe {
        command.pre_exec(move || {
            prctl::set_pdeathsig(signal)
                .map_err(|errno| io::Error::from_raw_os_error(errno as i32))?;

            // The parent may have exited before prctl took effect, and then
            // no signal will ever come.
            if unistd::getppid() != parent {
                return Err(io::Error::other("parent exited before exec"));
            }
            Ok(())
        });
    }
}

/// Sends `first` to the child, waits up to `grace` for it to exit, then
/// kills it with SIGKILL and reaps it.
pub fn stop_child(child: &mut Child, first: Signal, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }

    let pid = Pid::from_raw(child.id() as i32);
    let _ = signal::kill(pid, first);

    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }

    let _ = child.kill();
    let _ = child.wait();
}

/// Checks whether a process with this id exists and has not exited. A zombie,
/// which has exited but was not reaped, counts as exited.
pub fn is_running(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may
    // itself contain spaces or parentheses.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// Lists the ids of the processes whose parent is `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let parent_field = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1));
            parent_field == Some(parent.to_string().as_str())
        })
        .collect()
}

/// Kills `root` and everything it started with SIGKILL, as systemd does
/// to a service's control group.
///
/// Each process is stopped (SIGSTOP), and its children are listed only
/// once it has stopped, so none of them can start another process that
/// escapes the kill. The caller still reaps `root` if it is its child.
pub fn kill_process_tree(root: u32) {
    let mut stopped: Vec<u32> = vec![root];
    stop_and_wait(root);
    let mut next = 0;
    while next < stopped.len() {
        for child in children_of(stopped[next]) {
            if !stopped.contains(&child) {
                stop_and_wait(child);
                stopped.push(child);
            }
        }
        next += 1;
    }
    for pid in stopped {
        let _ = signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

/// Sends SIGSTOP and waits, for up to a second, until the process shows
/// as stopped, has exited or is gone, because kill(2) returns before the
/// signal takes effect.
fn stop_and_wait(pid: u32) {
    let _ = signal::kill(Pid::from_raw(pid as i32), Signal::SIGSTOP);
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return;
        };
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        if matches!(state, Some("T") | Some("t") | Some("Z") | Some("X") | None) {
            return;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Returns a process's command name (`/proc/<pid>/comm`), or `None` when it
/// is gone.
pub fn command_name(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|name| name.trim_end().to_owned())
}
