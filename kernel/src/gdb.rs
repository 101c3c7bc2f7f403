//! Kernel debugging: the host's gdb on the UML process.
//!
//! A UML guest kernel is an ordinary host process, so the host's own gdb
//! debugs it, with source lines when the kernel has debug information
//! (`kernel build --debug`). What a session needs and umlctl sets up:
//!
//! * the signals UML uses for itself (page faults in kernel mode, timers,
//!   I/O, CPU interrupts on SMP kernels: [`UML_SIGNALS`]) are passed on
//!   without stopping or printing, and gdb's own stops of new threads stay
//!   quiet; the processes UML forks for the guest's address spaces (which
//!   UML itself traces) are left alone (`detach-on-fork`);
//! * files are read from the host (`sysroot /`): a jail shows UML its
//!   kernel and libraries at their host paths;
//! * `run --gdb`: UML stops itself just before its `execve` (the jail's
//!   [`crate::jail::Launch::stop_before_exec`]); gdb attaches, follows it
//!   into exec and stops at the kernel binary's first instruction, where the
//!   breakpoints go in, so even `start_kernel` can be caught;
//!   `debug NAME`: gdb attaches to the running guest;
//! * the kernel's gdb helpers (`lx-dmesg`, `lx-ps`, …) are loaded when a
//!   `vmlinux-gdb.py` sits beside the kernel binary (a `--debug` build
//!   keeps one there);
//! * interactively gdb gets the terminal as its foreground process group
//!   (Ctrl-C reaches gdb only, which stops the guest); with a script
//!   (`--gdb-batch`) gdb reads the script, prints on umlctl's stderr and
//!   detaches when the script ends, so the guest runs on.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::error::{Error, Result};

/// Signals UML uses for itself, which gdb must pass on without stopping:
/// SIGSEGV (faults in kernel mode), SIGALRM/SIGVTALRM/SIGPROF (timers),
/// SIGIO (device I/O), SIGUSR1/SIGUSR2, SIGWINCH (consoles), SIGCHLD
/// (helpers and the processes of the guest), SIGSYS (seccomp mode),
/// SIGPIPE, and SIGRTMIN, which glibc numbers 34 (SMP kernels' CPU
/// interrupts).
pub const UML_SIGNALS: &[&str] = &[
    "SIGSEGV",
    "SIGUSR1",
    "SIGUSR2",
    "SIGIO",
    "SIGALRM",
    "SIGVTALRM",
    "SIGPROF",
    "SIGWINCH",
    "SIGCHLD",
    "SIGSYS",
    "SIGPIPE",
    "SIG34",
];

/// How long gdb may take to attach before umlctl gives up on it.
const ATTACH_DEADLINE: Duration = Duration::from_secs(60);

/// A debugging session as asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GdbSpec {
    /// `--break SYMBOL` (or any gdb location): set once the kernel is
    /// loaded.
    pub breaks: Vec<String>,
    /// `--gdb-batch FILE`: run this gdb script without a terminal, then
    /// detach (the guest runs on).
    pub batch: Option<PathBuf>,
}

impl GdbSpec {
    /// Check what can be checked before anything starts.
    pub fn validate(&self) -> Result<()> {
        for b in &self.breaks {
            if b.trim().is_empty() || b.chars().any(char::is_control) {
                return Err(Error::Usage(format!(
                    "--break {b:?}: name a function or a gdb location (for example --break __x64_sys_getppid or --break fs/open.c:1400)"
                )));
            }
        }
        if let Some(f) = &self.batch {
            let md = fs::metadata(f).map_err(|e| Error::io("read gdb script", f, e))?;
            if !md.is_file() {
                return Err(Error::Usage(format!(
                    "--gdb-batch {}: not a regular file (a gdb script is a file of gdb commands)",
                    f.display()
                )));
            }
            File::open(f).map_err(|e| Error::io("read gdb script", f, e))?;
        }
        Ok(())
    }

    /// Interactive: gdb needs a terminal.
    pub fn interactive(&self) -> bool {
        self.batch.is_none()
    }
}

/// What gdb attaches to.
#[derive(Debug, Clone)]
pub struct Target {
    /// The UML process, as the host sees it.
    pub pid: Pid,
    /// The kernel binary (host path; the jail shows it at the same path).
    pub kernel: PathBuf,
    /// The process is stopped just before exec'ing the kernel (`run
    /// --gdb`), rather than a running guest (`debug`).
    pub before_exec: bool,
    /// How the guest is called in messages.
    pub label: String,
}

/// The kernel's gdb helpers beside `kernel`, if any.
pub fn helpers_for(kernel: &Path) -> Option<PathBuf> {
    let p = kernel.parent()?.join(crate::build::GDB_LOADER);
    p.is_file().then_some(p)
}

/// The `--break` names that look like a function but are not in
/// `kernel`'s symbol table (nor as a compiler clone, `NAME.isra.0`): a
/// typo, or a function that exists only inlined (which gdb may still find
/// in the debug information). Locations (`file.c:120`, `*0x6000`) are
/// not checked.
pub fn unknown_functions(kernel: &Path, breaks: &[String]) -> Vec<String> {
    use object::{Object, ObjectSymbol};
    let names: Vec<&String> = breaks
        .iter()
        .filter(|b| {
            b.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && b.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .collect();
    if names.is_empty() {
        return Vec::new();
    }
    let Ok(file) = File::open(kernel) else {
        return Vec::new();
    };
    let cache = object::read::ReadCache::new(file);
    let Ok(elf) = object::File::parse(&cache) else {
        return Vec::new();
    };
    let mut found = vec![false; names.len()];
    for sym in elf.symbols() {
        let Ok(n) = sym.name() else { continue };
        for (i, want) in names.iter().enumerate() {
            if n == want.as_str()
                || n.strip_prefix(want.as_str())
                    .is_some_and(|r| r.starts_with('.'))
            {
                found[i] = true;
            }
        }
    }
    names
        .iter()
        .zip(found)
        .filter(|(_, f)| !f)
        .map(|(n, _)| n.to_string())
        .collect()
}

/// gdb on `PATH`, or an error saying how to get it.
pub fn find_gdb() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join("gdb");
        if fs::metadata(&p).is_ok_and(|m| m.is_file()) {
            return Ok(p);
        }
    }
    Err(Error::Host {
        check: "gdb",
        detail: "gdb is not installed (not found on PATH)".into(),
        fix: "install it (Debian: apt-get install gdb)".into(),
    })
}

/// The commands umlctl runs before the user's, one per `-ex`.
pub fn preamble(t: &Target, spec: &GdbSpec, helpers: Option<&Path>) -> Vec<String> {
    let mut c: Vec<String> = [
        "set pagination off",
        "set confirm off",
        "set print thread-events off",
        "set print inferior-events off",
        "set sysroot /",
        "set exec-file-mismatch off",
        "set follow-fork-mode parent",
        "set detach-on-fork on",
        "set follow-exec-mode same",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !spec.interactive() {
        c.push("set width 0".into());
        c.push("set height 0".into());
    }
    // Quietly (but for gdb's own notes that it redirects): the signal table, and the attach and exec, whose messages are about the
    // pre-exec process (umlctl), not the kernel.
    c.push("set logging file /dev/null".into());
    c.push("set logging redirect on".into());
    c.push("set logging enabled on".into());
    c.push(format!(
        "handle {} nostop noprint pass",
        UML_SIGNALS.join(" ")
    ));
    // gdb's attach and new threads stop with SIGSTOP; UML never sends one
    // to itself (only to the processes it traces, which gdb leaves alone).
    c.push("handle SIGSTOP nostop noprint nopass".into());
    c.push(format!("attach {}", t.pid));
    if t.before_exec {
        // It waits in read(2) until umlctl sees gdb attached.
        c.push("tcatch exec".into());
        c.push("continue".into());
    }
    c.push("set logging enabled off".into());
    c.push("set logging redirect off".into());
    if let Some(h) = helpers {
        c.push(format!("source {}", h.display()));
    }
    for b in &spec.breaks {
        c.push(format!("break {b}"));
    }
    if spec.interactive() {
        let what = if t.before_exec {
            format!(
                "umlctl: {} (UML pid {}) is stopped at the kernel's first instruction; `continue` boots it. Ctrl-C stops the guest; `detach` or `quit` lets it run on without gdb.",
                t.label, t.pid
            )
        } else {
            format!(
                "umlctl: {} (UML pid {}) is stopped; `continue` lets it run. Ctrl-C stops it again; `detach` or `quit` lets it run on without gdb.",
                t.label, t.pid
            )
        };
        c.push(format!("echo {}\\n", what.replace('\\', "\\\\")));
    }
    c
}

/// A running gdb.
pub struct Session {
    child: Child,
    /// The terminal gdb was given as its foreground process group, to be
    /// taken back when it leaves.
    terminal: Option<OwnedFd>,
    target: Pid,
}

/// The terminal for an interactive session: stdin if it is one, else the
/// controlling terminal.
fn terminal() -> Result<OwnedFd> {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(0) } == 1 {
        return std::os::fd::AsFd::as_fd(&io::stdin())
            .try_clone_to_owned()
            .map_err(|e| Error::sys("dup stdin", e));
    }
    File::options()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map(OwnedFd::from)
        .map_err(|_| {
            Error::Usage(
                "--gdb needs a terminal and umlctl has none; run a gdb script with --gdb-batch FILE instead"
                    .into(),
            )
        })
}

/// Whether a terminal is there for an interactive session.
pub fn check_terminal() -> Result<()> {
    terminal().map(drop)
}

/// Say which `--break` functions `kernel` seems not to have.
pub fn warn_unknown_functions(kernel: &Path, breaks: &[String]) {
    for n in unknown_functions(kernel, breaks) {
        eprintln!(
            "umlctl: warning: --break {n}: {} has no function {n} in its symbols (a typo? an inline-only function gdb may still find in the debug information; `nm {} | grep {n}` lists near names)",
            kernel.display(),
            kernel.display()
        );
    }
}

/// Start gdb on `t`. Returns once gdb has attached (and, before exec, has
/// followed UML into the kernel binary), or with an error if it could not.
/// `release` lets a process waiting before its exec go on; it is called
/// once gdb has attached.
pub fn start(t: &Target, spec: &GdbSpec, release: &mut dyn FnMut()) -> Result<Session> {
    let gdb = find_gdb()?;
    let helpers = helpers_for(&t.kernel);
    let mut cmd = Command::new(&gdb);
    cmd.arg("-q").arg("-nx");
    if !spec.interactive() {
        cmd.arg("-batch");
    }
    for c in preamble(t, spec, helpers.as_deref()) {
        cmd.arg("-ex").arg(c);
    }
    if let Some(f) = &spec.batch {
        cmd.arg("-x").arg(f);
    }
    let terminal = if spec.interactive() {
        let tty = terminal()?;
        let io = |fd: &OwnedFd| -> Result<Stdio> {
            Ok(Stdio::from(
                fd.try_clone().map_err(|e| Error::sys("dup terminal", e))?,
            ))
        };
        cmd.stdin(io(&tty)?).stdout(io(&tty)?).stderr(io(&tty)?);
        Some(tty)
    } else {
        let err = std::os::fd::AsFd::as_fd(&io::stderr())
            .try_clone_to_owned()
            .map_err(|e| Error::sys("dup stderr", e))?;
        let err2 = err.try_clone().map_err(|e| Error::sys("dup stderr", e))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(err))
            .stderr(Stdio::from(err2));
        None
    };
    // SAFETY: setpgid is async-signal-safe and touches only this process.
    unsafe {
        cmd.pre_exec(|| {
            // Its own process group: a terminal's Ctrl-C reaches gdb alone
            // (interactive), or not at all (batch; umlctl handles it).
            libc::setpgid(0, 0);
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| Error::io("execute", &gdb, e))?;
    let gpid = crate::num::pid(child.id());
    // Also from here, so that the group exists before the terminal is
    // handed to it (an error means the child already did it).
    let _ = nix::unistd::setpgid(gpid, gpid);
    let mut session = Session {
        child,
        terminal: None,
        target: t.pid,
    };
    if let Some(tty) = terminal {
        // SAFETY: tcsetpgrp changes the terminal's foreground group only.
        unsafe { libc::tcsetpgrp(tty.as_raw_fd(), gpid.as_raw()) };
        session.terminal = Some(tty);
    }
    session.wait_attached(t, release)?;
    Ok(session)
}

/// The tracer of `pid` (0: none) and whether it still runs `exe`.
fn tracer_and_exe(pid: Pid) -> Option<(i32, Option<PathBuf>)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let tracer = status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Some((tracer, fs::read_link(format!("/proc/{pid}/exe")).ok()))
}

impl Session {
    fn wait_attached(&mut self, t: &Target, release: &mut dyn FnMut()) -> Result<()> {
        let deadline = Instant::now() + ATTACH_DEADLINE;
        let gdb_pid = i32::try_from(self.child.id()).unwrap_or(i32::MAX);
        let mut released = false;
        let kernel = fs::canonicalize(&t.kernel).unwrap_or_else(|_| t.kernel.clone());
        loop {
            let (tracer, exe) = tracer_and_exe(t.pid).ok_or_else(|| Error::Host {
                check: "gdb",
                detail: format!("UML (pid {}) ended before gdb attached", t.pid),
                fix: "see the messages above".into(),
            })?;
            if tracer == gdb_pid && !released {
                release();
                released = true;
            }
            let in_kernel = !t.before_exec || exe.as_deref() == Some(kernel.as_path());
            if tracer == gdb_pid && in_kernel {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(self.attach_failed(format!("gdb exited ({st}) without attaching")));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return Err(self.attach_failed(format!(
                    "gdb did not attach within {} s",
                    ATTACH_DEADLINE.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn attach_failed(&mut self, detail: String) -> Error {
        let _ = self.child.wait();
        self.give_back_terminal();
        let yama = fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(0);
        let fix = if yama >= 2 {
            format!("kernel.yama.ptrace_scope = {yama} lets only root (or nobody) attach a debugger: run umlctl as root, or as root `sysctl kernel.yama.ptrace_scope=1`")
        } else if yama == 1 && !nix::unistd::geteuid().is_root() {
            "kernel.yama.ptrace_scope = 1 lets you attach only to your own descendants: run umlctl as root, or as root `sysctl kernel.yama.ptrace_scope=0`".to_string()
        } else {
            "see gdb's messages above (`ptrace: Operation not permitted` means the host forbids ptrace: a container without CAP_SYS_PTRACE, or a seccomp filter)".to_string()
        };
        Error::Host {
            check: "gdb",
            detail: format!("{detail} to UML (pid {})", self.target),
            fix,
        }
    }

    /// Give the terminal back to umlctl's own process group.
    fn give_back_terminal(&mut self) {
        if let Some(tty) = self.terminal.take() {
            // SAFETY: blocking SIGTTOU in this thread (tcsetpgrp from a
            // background group would raise it) and changing the terminal's
            // foreground group; the mask is restored.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                let mut old: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGTTOU);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
                libc::tcsetpgrp(tty.as_raw_fd(), libc::getpgrp());
                libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            }
        }
    }

    /// Wait for gdb to leave (the user quits, or the script ends).
    pub fn wait(mut self) -> Result<ExitStatus> {
        let st = self.child.wait().map_err(|e| Error::sys("wait for gdb", e));
        self.give_back_terminal();
        st
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.give_back_terminal();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(before_exec: bool) -> Target {
        Target {
            pid: Pid::from_raw(42),
            kernel: "/k/linux".into(),
            before_exec,
            label: "the guest".into(),
        }
    }

    #[test]
    fn preamble_attaches_follows_exec_and_sets_breakpoints_after() {
        let spec = GdbSpec {
            breaks: vec!["sys_getppid".into(), "panic".into()],
            batch: Some("/s.gdb".into()),
        };
        let p = preamble(&target(true), &spec, Some(Path::new("/k/vmlinux-gdb.py")));
        let at = |s: &str| p.iter().position(|c| c == s).unwrap_or(usize::MAX);
        assert!(at("attach 42") < at("tcatch exec"));
        assert!(at("tcatch exec") < at("continue"));
        assert!(at("continue") < at("source /k/vmlinux-gdb.py"));
        assert!(at("source /k/vmlinux-gdb.py") < at("break sys_getppid"));
        assert!(at("break sys_getppid") < at("break panic"));
        assert!(p.iter().any(|c| c.starts_with("handle SIGSEGV")
            && c.contains("SIG34")
            && c.ends_with("nostop noprint pass")));
        assert!(p.contains(&"set width 0".to_string()));
        assert!(!p.iter().any(|c| c.starts_with("echo")));
    }

    #[test]
    fn attaching_to_a_running_guest_does_not_wait_for_exec() {
        let spec = GdbSpec::default();
        let p = preamble(&target(false), &spec, None);
        assert!(p.contains(&"attach 42".to_string()));
        assert!(!p.iter().any(|c| c == "continue" || c.contains("exec ")));
        assert!(!p.iter().any(|c| c.starts_with("source")));
        let echo = p.iter().find(|c| c.starts_with("echo")).unwrap();
        assert!(
            echo.contains("UML pid 42") && echo.ends_with("\\n"),
            "{echo}"
        );
    }

    #[test]
    fn functions_missing_from_the_symbols_are_found_and_locations_left_alone() {
        let exe = std::env::current_exe().unwrap();
        let breaks: Vec<String> = ["main", "no_such_function_xyz", "file.c:12", "*0x6000"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(unknown_functions(&exe, &breaks), ["no_such_function_xyz"]);
        assert!(unknown_functions(Path::new("/nonexistent"), &breaks).is_empty());
    }

    #[test]
    fn bad_breakpoints_and_scripts_are_named() {
        for b in ["", "  ", "a\nb"] {
            let e = GdbSpec {
                breaks: vec![b.into()],
                batch: None,
            }
            .validate()
            .unwrap_err();
            assert!(e.to_string().contains("--break"), "{e}");
        }
        let e = GdbSpec {
            breaks: vec![],
            batch: Some("/".into()),
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(GdbSpec {
            breaks: vec![],
            batch: Some("/nonexistent/x.gdb".into()),
        }
        .validate()
        .is_err());
    }
}
