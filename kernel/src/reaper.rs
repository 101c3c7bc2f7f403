//! The reaper: a small watchdog process that outlives a killed umlctl.
//!
//! UML's helper processes (its I/O and SIGIO threads) do not die when the
//! UML process is killed, and `run` can only clean up while it is alive.
//! So each `run` forks a reaper first, in its own process group (a Ctrl-C
//! meant for umlctl does not reach it) and with nothing of umlctl's open
//! but one pipe. `run` tells it the UML pid through the pipe, and `done`
//! when it has cleaned up itself. If the pipe closes without `done`
//! (umlctl was killed), the reaper kills UML's whole process group (UML
//! calls setsid(), so its helpers share its pid as process group) and then
//! execs umlctl with [`CLEAN_ENV`] set, which removes the run directory.
//!
//! The forked reaper never returns to Rust code: between fork and exec it
//! only makes async-signal-safe system calls, as a child of a
//! multi-threaded process must.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::unistd::{fork, ForkResult, Pid};

use crate::error::{errno, Error, Result};

/// Set (to a run directory) in the environment of the umlctl the reaper
/// execs to remove that directory; the binary's `main` must dispatch to
/// [`clean`] when it is present.
pub const CLEAN_ENV: &str = "UMLCTL_REAPER_CLEAN";

/// `run`'s handle on its reaper.
pub struct Reaper {
    pid: Pid,
    orders: OwnedFd,
}

impl Reaper {
    /// Fork the reaper for the run directory `rundir`.
    pub fn spawn(exe: &Path, rundir: &Path) -> Result<Reaper> {
        let bad = |what: &str| Error::Usage(format!("{what} contains a NUL byte"));
        let exe_c = CString::new(exe.as_os_str().as_bytes()).map_err(|_| bad("umlctl path"))?;
        let arg0 = CString::from(c"umlctl-reaper");
        let env =
            CString::new([CLEAN_ENV.as_bytes(), b"=", rundir.as_os_str().as_bytes()].concat())
                .map_err(|_| bad("run directory"))?;
        let devnull = CString::from(c"/dev/null");
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::sys("pipe", errno(e)))?;
        let rfd = r.as_raw_fd();
        // SAFETY: the child runs `reaper_child`, which only makes
        // async-signal-safe system calls and never returns.
        match unsafe { fork() }.map_err(|e| Error::sys("fork the reaper", errno(e)))? {
            // SAFETY: in the forked child; reaper_child never returns and
            // only makes async-signal-safe calls on these prepared strings.
            ForkResult::Child => unsafe { reaper_child(rfd, &exe_c, &arg0, &env, &devnull) },
            ForkResult::Parent { child } => {
                drop(r);
                Ok(Reaper {
                    pid: child,
                    orders: w,
                })
            }
        }
    }

    /// Tell the reaper which process group to kill should umlctl die.
    pub fn watch(&self, uml_pid: u32) {
        let msg = format!("pid {uml_pid}\n");
        let _ = nix::unistd::write(&self.orders, msg.as_bytes());
    }

    /// umlctl cleaned up itself; the reaper exits without doing anything.
    pub fn dismiss(self) {
        let _ = nix::unistd::write(&self.orders, b"done\n");
        drop(self.orders);
        let _ = nix::sys::wait::waitpid(self.pid, None);
    }
}

/// The reaper's body, in the forked child.
///
/// # Safety
/// Must only be called in a freshly forked child; never returns.
unsafe fn reaper_child(
    rfd: i32,
    exe: &CString,
    arg0: &CString,
    env: &CString,
    devnull: &CString,
) -> ! {
    libc::setpgid(0, 0);
    for sig in [
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGTERM,
        libc::SIGQUIT,
        libc::SIGPIPE,
    ] {
        libc::signal(sig, libc::SIG_IGN);
    }
    // Keep nothing of umlctl's open (its stdout, UML's pipes) but the order
    // pipe, as fd 0.
    if libc::dup2(rfd, 0) < 0 {
        libc::_exit(1);
    }
    let null = libc::open(devnull.as_ptr(), libc::O_RDWR);
    if null >= 0 {
        libc::dup2(null, 1);
        libc::dup2(null, 2);
    }
    if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
        for fd in 3..4096 {
            libc::close(fd);
        }
    }
    // Read orders: "pid N\n" and "done\n".
    let mut buf = [0u8; 256];
    let mut len = 0usize;
    let mut pid: i32 = 0;
    loop {
        if len == buf.len() {
            len = 0;
        }
        let n = libc::read(0, buf.as_mut_ptr().add(len).cast(), buf.len() - len);
        if n < 0 && *libc::__errno_location() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            break; // umlctl is gone
        }
        len += usize::try_from(n).unwrap_or(0);
        while let Some(nl) = buf[..len].iter().position(|&b| b == b'\n') {
            let line = &buf[..nl];
            if line == b"done" {
                libc::_exit(0);
            }
            if let Some(digits) = line.strip_prefix(b"pid ") {
                let mut v: i32 = 0;
                for &d in digits {
                    if d.is_ascii_digit() {
                        v = v.saturating_mul(10).saturating_add(i32::from(d - b'0'));
                    }
                }
                pid = v;
            }
            buf.copy_within(nl + 1..len, 0);
            len -= nl + 1;
        }
    }
    if pid > 1 {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
    let argv = [arg0.as_ptr(), std::ptr::null()];
    let envp = [env.as_ptr(), std::ptr::null()];
    libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
    libc::_exit(0)
}

/// Remove a run directory left by a killed umlctl (run in the process the
/// reaper execs).
pub fn clean() -> ! {
    if let Some(dir) = std::env::var_os(CLEAN_ENV).map(PathBuf::from) {
        let name_ok = dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("umlctl-"));
        if dir.is_absolute() && name_ok {
            // The killed processes may take a moment to release their files.
            for _ in 0..20 {
                if std::fs::remove_dir_all(&dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
    std::process::exit(0)
}
