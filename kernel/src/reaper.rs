//! The reaper: a small watchdog process that outlives a killed umlctl.
//!
//! UML's helper processes (its I/O and SIGIO threads) do not die when the
//! UML process is killed, and `run` can only clean up while it is alive.
//! So each `run` starts a reaper (umlctl itself, recognised by
//! [`REAPER_ENV`] in its environment), in its own process group so that a
//! Ctrl-C meant for umlctl does not reach it. `run` tells it the UML pid
//! through a pipe, and `done` when it has cleaned up itself. If the pipe
//! closes without `done` (umlctl was killed), the reaper kills UML's whole
//! process group (UML calls setsid(), so its helpers share its pid as
//! process group) and removes the run directory.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;

/// Set (to the run directory) in the reaper's environment.
pub const REAPER_ENV: &str = "UMLCTL_REAPER_RUNDIR";

/// Entry point of the reaper: reads its orders on stdin.
pub fn main() -> ! {
    // SAFETY: ignoring job-control signals has no memory effects.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    let rundir = std::env::var_os(REAPER_ENV).map(PathBuf::from);
    let mut uml: Option<i32> = None;
    let mut done = false;
    for line in BufReader::new(std::io::stdin().lock()).lines() {
        let Ok(line) = line else { break };
        let line = line.trim();
        if line == "done" {
            done = true;
            break;
        }
        if let Some(pid) = line.strip_prefix("pid ").and_then(|p| p.parse().ok()) {
            uml = Some(pid);
        }
    }
    if !done {
        if let Some(pid) = uml.filter(|&p| p > 1) {
            // SAFETY: kill(2) on a process group.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
                libc::kill(pid, libc::SIGKILL);
            }
        }
        if let Some(dir) = rundir.filter(|d| d.is_absolute()) {
            // Give the kernel a moment to release the dead processes' files.
            std::thread::sleep(std::time::Duration::from_millis(100));
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    std::process::exit(0)
}
